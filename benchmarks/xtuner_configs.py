"""How many of XTuner's own config files xtune reads, and why it refuses the others.

    python benchmarks/xtuner_configs.py PATH/TO/xtuner/configs

Each `.py` under the folder goes through `xtune.config.load.load_config` (XTuner configs are read with `ast`,
never run); the refusals are grouped by their message with numbers, paths and quoted values taken out.
"""

import collections
import re
import sys
from pathlib import Path

from xtune.config.load import load_config


def main(folder: Path) -> None:
    files = sorted(path for path in folder.rglob("*.py") if path.name != "__init__.py")
    reasons: collections.Counter = collections.Counter()
    example: dict[str, str] = {}
    for path in files:
        try:
            load_config(str(path))
        except Exception as error:  # every refusal, whatever its kind, is counted
            message = str(error).splitlines()[0].replace(str(path), "FILE")
            reason = re.sub(r"'[^']*'|\d+", "_", message)[:140]
            reasons[reason] += 1
            example.setdefault(reason, f"{path.relative_to(folder)}: {message[:200]}")
    print(f"read {len(files) - sum(reasons.values())} of {len(files)} config files")
    for reason, count in reasons.most_common():
        print(f"{count:4d}  {example[reason]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
