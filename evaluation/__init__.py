"""Evaluation, one place for every caller: features of any layers x poolings and their distributed
gather, the classification evaluate, weighted k-NN, and COCO detection metrics."""
