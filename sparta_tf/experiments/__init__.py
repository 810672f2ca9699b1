"""Runs of many trainings, as the apps `sparta-compare` and `sparta-transfer` make them.

A grid of cells (objective x arm x seed), one module per job:

- `arms`: the arms (activations, denoising blocks, a transferred Sparta) and each cell's
  `TrainConfig`;
- `cells`: how a cell is evaluated (`EvalSettings`, `evaluate`, the per-image bits);
- `cache`: the evaluations a cell keeps in its model_dir and which of them serve (`match`,
  a pure function that also reads evaluations written by earlier versions);
- `stats`: means over seeds and paired differences with a bootstrap interval;
- `report`: the Markdown of a grid (comparison.md);
- `figures`: its pictures;
- `grid`: `run_grid`, which trains, evaluates, caches and reports every cell;
- `ablation`: several grids of Sparta variants as one table;
- `compare`: the names these had when they were one module, named again for old code.

It writes files, and sits apart from the library that a user imports into a model
(`layers`, `models`, `training`, `evaluation`, ...), which it only calls.
"""
