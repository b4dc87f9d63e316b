"""What the tools in ``tools/`` share; the tools are scripts (``python tools/train.py``), whose folder is on
``sys.path``, so they import this package as ``toolkit``.

- ``cli``: argument parsing (one-line usage errors, YAML recipes), model lookup and creation;
- ``checkpoint_io``: reading weights from training checkpoints and official files, saving weights;
- ``evaluation``: the distributed runtime and top-1/top-5 evaluation;
- ``image_data``: the datasets (image folders, the embedded digits) and their samplers;
- ``cuda_graphs``: the CUDA-graph capture recipe for inference and training steps;
- ``bench_records``: the benchmark records of ``model_cards/benchmarks/`` and their ``history.json``.
"""
