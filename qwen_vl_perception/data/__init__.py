"""Datasets and figures: label files (``labels``), synthetic scenes, SFT training data, image
folders and the precision/recall evaluation. Used by the tools and the tests, not by the node.
"""
