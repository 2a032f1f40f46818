"""prefixserve load testing: seeded workloads, runners (engine, HTTP, PEFT baselines), metrics,
reports and plots (`prefixserve bench`), and a Locust file for deployed servers. See docs/benchmarks.md."""
