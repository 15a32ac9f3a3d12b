from setuptools import find_packages, setup


setup(
    name="crosstvr",
    version="0.1.0",
    description="CrossTVR: two-stage text-video retrieval with frozen image encoders, for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["crosstvr", "crosstvr.*"]),
    # The embedded default model (safetensors, configs, tokenizers, model card and the Hub-portable code files).
    package_data={"crosstvr": ["default_checkpoint/*", "default_checkpoint/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        # The README's install commands pin torch==2.13.0 (a CPU build is on local disk on our CI machines).
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "evaluate>=0.4",
        "peft>=0.13",
        "decord>=0.6",
        # PyAV writes the generated sample and fixture videos (decord only reads).
        "av>=12",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # FAISS serves stage-1 search of large indexes; without it, search is an exact matrix product.
        "faiss": ["faiss-cpu>=1.8"],
        # The synthetic benchmark's recipe draws its recall-against-depth plot with matplotlib; the performance
        # benchmark's peer reader (CLIP4Clip's) decodes with OpenCV.
        "benchmarks": ["matplotlib>=3.7", "opencv-python-headless>=4.8"],
        # The search page (`crosstvr serve`, app.py).
        "app": ["gradio>=5,<7"],
        # The browser tests drive Debian's chromium / chromium-driver with Selenium.
        "dev": ["pytest>=8", "faiss-cpu>=1.8", "matplotlib>=3.7", "gradio>=5,<7", "selenium>=4.10"],
    },
    entry_points={"console_scripts": ["crosstvr=crosstvr.cli:main"]},
)
