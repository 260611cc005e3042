"""A class-conditional digit generator trained on scikit-learn's digits, for demos and benchmarks."""
