"""Build script for megacore.

The only compiled part is ``megacore_cpp._helpers`` (dataset index helpers), built with
pybind11 at install time so nothing compiles at run time.
"""

import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    scope = {}
    with open(os.path.join(HERE, "megacore", "package_info.py"), encoding="utf-8") as f:
        exec(f.read(), scope)
    return scope["__version__"]


def read_readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


ext_modules = [
    Pybind11Extension(
        "megacore_cpp._helpers",
        sources=["megacore_cpp/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    name="megacore",
    version=read_version(),
    description="Model-parallelism core library for transformer training, tested on CPU",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["megacore", "megacore.*", "megacore_cpp"]),
    package_data={"megacore": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        # torch is not pinned: install torch==2.13.0 (CPU) first, as the README says.
        "torch>=2.4",
        "numpy>=1.24",
        "einops>=0.7",
        "regex>=2023.0",
        "nltk>=3.8",
        "tokenizers>=0.15",
        "tiktoken>=0.6",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "fastapi>=0.110",
        "jinja2>=3.1",  # chat templates of Hugging Face tokenizers
        "uvicorn>=0.27",
        # Chat templates of Hugging Face tokenizers (/v1/chat/completions).
        "jinja2>=3.1",
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "httpx>=0.25",
            "transformers>=4.40",
            "sentencepiece>=0.1.99",
            # Byte-level interop tests against Megatron's own .bin/.idx builder and
            # GPTDataset (a CPU-only wheel here; needs only numpy, packaging and torch).
            "megatron-core==0.16.1",
            # Real clients of the OpenAI-compatible server: the openai package and
            # lm-evaluation-harness's local-completions / local-chat-completions.
            "openai>=1.0",
            "lm-eval[api]>=0.4.5",
        ],
        "dev": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "httpx>=0.25",
            "transformers>=4.40",
            "sentencepiece>=0.1.99",
            "megatron-core==0.16.1",
            "openai>=1.0",
            "lm-eval[api]>=0.4.5",
            "ruff>=0.4",
        ],
        # Optional accelerations, only used on CUDA when importable. NVIDIA Apex is not on
        # PyPI (the PyPI package called "apex" is unrelated) and is never required.
        "te": ["transformer_engine[pytorch]"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
    entry_points={},
    zip_safe=False,
)
