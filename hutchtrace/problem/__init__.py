"""What is measured: the parameter blocks (:mod:`.blocks`) and the loss in its accepted forms
(criterion, closure, dataset; :mod:`.loss`).

Imports: ``core`` only.
"""
