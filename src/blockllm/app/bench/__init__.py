"""The benchmark harness behind ``blockllm bench``, ``blockllm report`` and ``blockllm demo``.

* :mod:`~blockllm.app.bench.suites`: which methods a suite runs, on what, for how long (data only).
* :mod:`~blockllm.app.bench.runner`: runs a suite, one child process per method.
* :mod:`~blockllm.app.bench.records`: one comparable record per method, and the table.
* :mod:`~blockllm.app.bench.report`: reads run directories and compares them in one table.
* :mod:`~blockllm.app.bench.plots`: the PNG plots of one or several runs.

The standalone scripts under ``benchmarks/`` sit outside the package.
"""
