"""guard: inference-time memorization mitigation (GUARD) for text-to-image diffusion models."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="guard",
    version="0.1.0",
    description="GUARD: surgical memorization mitigation for text-to-image diffusion, with fused Triton kernels",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["guard", "guard.*", "guard_kernels", "guard_kernels.*"]),
    package_data={"guard.testbed": ["weights/*", "weights/*/*", "README.md"]},
    include_package_data=True,
    install_requires=[
        # Install the torch build you want first (CPU or CUDA); any 2.1+ satisfies this.
        "torch>=2.1",
        "numpy",
        "diffusers>=0.30",
        "transformers>=4.40",
        "tokenizers",
        "safetensors",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # Triton ships with CUDA builds of torch; on CPU it only runs under TRITON_INTERPRET=1.
        "triton": ["triton>=3.0"],
        "testbed": ["scikit-image>=0.21"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.0", "scikit-image>=0.21"],
        "bench": ["pytest>=7", "pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["guard=guard.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
