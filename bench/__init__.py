"""The overhead benchmark of llm-router (`python -m bench`, `make bench`; `--quick` for `make bench-quick`).

It proves the promise of a thin layer: against a loopback OpenAI-compatible upstream in another process,
`router.Router` costs about what bare litellm costs, per call, under load, on a fallback, in memory and at
startup. Results go to bench/results/ (RESULTS.md, overhead.png, results.json); `python -m bench.profile`
shows where the remaining CPU goes.
"""
