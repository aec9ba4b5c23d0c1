"""Attacks on safety patches: how easily a patched model is made to draw the erased concept.

`conceptguard attack` runs them (cli.py); `bench erasure-sweep --attacks` adds their success
rates to the method tables. The attacks are re-implemented from their published descriptions
(docs/ERASURE.md, "Attacking a patch"): paraphrases, Ring-A-Bell, an UnlearnDiffAtk-style
prefix optimisation and textual inversion through the patched model.
"""
