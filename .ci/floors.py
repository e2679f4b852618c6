"""Print the runtime dependencies of pyproject.toml pinned at their floors (`name==lowest`):
the constraints of .ci/run's lowest-versions environment, so a floor that no longer works is
found in CI, not on a user's machine. (No tomllib: it is not in Python 3.10.)"""

import re
from pathlib import Path

text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
for requirement in re.findall(r'"([^"]+)"', block):
    name, floor = re.match(r"([A-Za-z0-9_.-]+).*?>=\s*([0-9][0-9.]*)", requirement).groups()
    print(f"{name}=={floor}")
