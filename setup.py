"""Builds spconv and its CPU extension spconv._C (torch.ops.spconv.*) from src/ and include/."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("src", "*.cpp")))

setup(
    packages=find_packages(include=["spconv", "spconv.*"]),
    ext_modules=[
        CppExtension(
            "spconv._C",
            sources,
            include_dirs=[os.path.join(here, "include")],
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
