"""Backbones (with the weights reader), feature extraction and ImageNet predictions."""
