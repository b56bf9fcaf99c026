"""setup.py for setuptools older than 61, which cannot read pyproject.toml's [project].

RHEL 9's python3-setuptools is 53.0.0: it builds only from setup.py/setup.cfg
metadata, and RHEL 9 has no newer setuptools for its python3 (3.9). snpd.spec
builds there with %py3_build and %py3_install, pointing %py_setup at this file
(bcond legacy_setup). It holds no metadata of its own: it reads pyproject.toml
(tomllib, or tomli on Python < 3.11; RHEL 9 packages python3-tomli 2.0.1) and
passes the same name, version, packages, package data, console scripts,
requirements and Python floor to setuptools.setup(). A [project] or
[tool.setuptools] key this file does not know stops the build instead of being
left out. tests/packaging/test_legacy_setup.py installs snpd with it under
Python 3.9 and setuptools 53.0.0 and compares the result with a pyproject build.

Run it from anywhere: it works in the directory that holds pyproject.toml (two
levels up), as setup.py would.
"""

import os
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from setuptools import find_namespace_packages, find_packages, setup

ROOT = Path(__file__).resolve().parents[2]

# What each [project] key becomes; a key missing here is refused (see below).
PROJECT_KEYS = {
    "name", "version", "description", "readme", "requires-python", "license",
    "authors", "maintainers", "keywords", "classifiers", "urls", "dependencies",
    "optional-dependencies", "scripts", "gui-scripts", "entry-points",
}
TOOL_KEYS = {"packages", "package-data", "include-package-data", "zip-safe"}
FIND_KEYS = {"where", "include", "exclude", "namespaces"}
README_TYPES = {".md": "text/markdown", ".rst": "text/x-rst", ".txt": "text/plain"}


def refuse(message):
    sys.exit(f"setup-legacy.py: {message}: pyproject.toml uses what this file does not "
             "translate; extend packaging/rpm/setup-legacy.py")


def people(entries):
    """PEP 621 authors/maintainers as setuptools' (names, emails) strings."""
    names = ", ".join(e["name"] for e in entries if "name" in e and "email" not in e)
    emails = ", ".join(f'{e["name"]} <{e["email"]}>' if "name" in e else e["email"]
                       for e in entries if "email" in e)
    return names or None, emails or None


def arguments(pyproject):
    project = pyproject["project"]
    unknown = set(project) - PROJECT_KEYS
    if unknown:
        refuse(f"[project] keys {sorted(unknown)}")
    if "dynamic" in project:
        refuse("[project] dynamic")
    tool = pyproject.get("tool", {}).get("setuptools", {})
    unknown = set(tool) - TOOL_KEYS
    if unknown:
        refuse(f"[tool.setuptools] keys {sorted(unknown)}")

    args = {
        "name": project["name"],
        "version": project["version"],
        "install_requires": list(project.get("dependencies", [])),
        "extras_require": {k: list(v) for k, v in
                           project.get("optional-dependencies", {}).items()},
        # setuptools >= 61 defaults to these for pyproject.toml projects
        "include_package_data": tool.get("include-package-data", True),
        "zip_safe": tool.get("zip-safe", False),
    }
    for key, arg in (("description", "description"), ("requires-python", "python_requires"),
                     ("keywords", "keywords"), ("classifiers", "classifiers")):
        if key in project:
            args[arg] = project[key]
    readme = project.get("readme")
    if readme is not None:
        if isinstance(readme, str):
            readme = {"file": readme}
        if "file" in readme:
            text = (ROOT / readme["file"]).read_text(encoding=readme.get("charset", "utf-8"))
            kind = readme.get("content-type", README_TYPES.get(Path(readme["file"]).suffix))
        else:
            text, kind = readme["text"], readme["content-type"]
        args["long_description"] = text
        if kind:
            args["long_description_content_type"] = kind
    if "license" in project:
        lic = project["license"]
        if isinstance(lic, str):
            args["license"] = lic
        elif "text" in lic:
            args["license"] = lic["text"]
        else:
            args["license_files"] = [lic["file"]]
    for key, name_arg, email_arg in (("authors", "author", "author_email"),
                                     ("maintainers", "maintainer", "maintainer_email")):
        if key in project:
            names, emails = people(project[key])
            if names:
                args[name_arg] = names
            if emails:
                args[email_arg] = emails
    if "urls" in project:
        args["project_urls"] = dict(project["urls"])

    entry_points = {}
    for key, group in (("scripts", "console_scripts"), ("gui-scripts", "gui_scripts")):
        if project.get(key):
            entry_points[group] = [f"{n} = {t}" for n, t in project[key].items()]
    for group, points in project.get("entry-points", {}).items():
        entry_points[group] = [f"{n} = {t}" for n, t in points.items()]
    if entry_points:
        args["entry_points"] = entry_points

    packages = tool.get("packages", {"find": {}})
    if isinstance(packages, list):
        args["packages"] = packages
    else:
        find = packages.get("find", {})
        unknown = set(find) - FIND_KEYS
        if unknown:
            refuse(f"[tool.setuptools.packages.find] keys {sorted(unknown)}")
        wheres = find.get("where", ["."])
        if len(wheres) != 1:
            refuse("more than one [tool.setuptools.packages.find] where")
        # pyproject.toml's find looks for PEP 420 namespace packages too, by default
        finder = find_namespace_packages if find.get("namespaces", True) else find_packages
        args["packages"] = finder(where=wheres[0], include=find.get("include", ["*"]),
                                  exclude=find.get("exclude", []))
        if wheres[0] != ".":
            args["package_dir"] = {"": wheres[0]}
    if "package-data" in tool:
        args["package_data"] = {k: list(v) for k, v in tool["package-data"].items()}
    return args


def main():
    os.chdir(ROOT)
    with open("pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    setup(**arguments(pyproject))


if __name__ == "__main__":
    main()
