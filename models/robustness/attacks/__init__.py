"""The attacks of the robustness evaluation, one per module on a small shared base (``base``).

``models.robustness.spec`` names them (``ATTACKS``: kind -> ``base.Attack``) and runs a spec. Transfer
attacks on the undefended model: ``pgd``, ``apgd`` (CE, DLR), ``one_frame``, ``flickering``, ``noise``
(the random baseline); attacks that know the defence's loss: ``adaptive``; attacks differentiating
through the purification: ``bpda``, ``through``; attacks on the multi-signal flag: ``flag``.
"""
