"""Runs of many trainings, as the apps `sparta-compare` and `sparta-transfer` make them.

`compare` trains, caches and reports a grid of cells (activations, objectives, seeds); it
writes files. It sits apart from the library that a user imports into a model (`layers`,
`models`, `training`, `evaluation`, ...), which it only calls.
"""
