"""Benchmarks behind `make bench`: each module exposes ``run() -> dict``; results land in bench/out/."""
