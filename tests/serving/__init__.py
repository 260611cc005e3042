"""Tests of `vllm serve` with SJD++ on the tiny Llama, sharing one server (`conftest.py`)."""
