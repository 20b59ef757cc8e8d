"""Parts of benchmarks/bench_nodes.py: instrumentation (clocks, the training observer, allocation peaks), measure
(graphs and runs), report (ratios and verdicts)."""
