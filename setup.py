"""Map the project's top-level folders to the `pycontainerd.*` import names.

The layout keeps core/, plugins/, api/, config/ and cmd/ at the top of the repository, but none of
them may be installed as a top-level module (`cmd` would shadow the standard library).
"""
from setuptools import find_packages, setup

TOP = ("core", "plugins", "api", "config", "cmd")

packages = []
package_dir = {}
for top in TOP:
    package_dir[f"pycontainerd.{top}"] = top
    for sub in find_packages(where=".", include=[top, f"{top}.*"]):
        packages.append(f"pycontainerd.{sub}")

setup(packages=packages, package_dir=package_dir)
