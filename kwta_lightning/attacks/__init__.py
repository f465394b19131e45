"""Robustness evaluation: attacks on a checkpoint, the worst case over them, and diagnostics.

``attack.py`` composes ``conf/attack.yaml``; ``runner.run(cfg)`` loads the checkpoint
(``checkpoint``), runs every configured attack at every eps (``evaluate``, through the result
cache of ``store``), checks the numbers for signs of gradient masking and gives the verdict
(``diagnostics``), and writes the report (``kwta_lightning.attacks.report``) after every attack.
``merge`` combines reports of one checkpoint. The attacks: ``pgd`` (PGD with a step schedule and
restarts), ``adaptive`` (NES, BPDA, transfer), ``library`` (foolbox, APGD, Square, AutoAttack),
``vga``.
"""
