"""Robustness evaluation: attacks on a checkpoint, the worst case over them, and diagnostics.

``attack.py`` composes ``conf/attack.yaml``; ``runner.run(cfg)`` loads the checkpoint
(``checkpoint``), runs every configured attack at every eps (``evaluate``), checks the numbers for
signs of gradient masking (``diagnostics``) and writes the report (``kwta_lightning.report``).
"""
