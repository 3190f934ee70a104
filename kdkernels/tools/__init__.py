"""Tooling around the library, not needed to use it: the command line (``cli``), the benchmark
(``bench``, ``eager``: the naive baseline), plots (``plotting``), the RSS probe
(``memory_probe``) and the demo (``demo``)."""
