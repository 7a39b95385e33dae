"""The benchmark behind ``make bench`` (entry point: experiments/bench.py): measuring and recording
(``recording``), the seeded workload (``workload``), backbone, fit and coreset timings (``fitting``,
``coresets``), the search backends (``searches``), prediction against the published pipelines
(``prediction``), the scaling studies (``scaling``) and the printed table with the goal ratios (``table``)."""
