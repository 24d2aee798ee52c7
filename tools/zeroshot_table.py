"""The before-vs-after Markdown table of two `zeroshot --json` files (the table `compare --zeroshot` prints).

Usage: python tools/zeroshot_table.py BASE.json PRUNED.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gatenorm_edge.harness.zeroshot import ZeroShotReport, before_after_rows
from gatenorm_edge.report import zeroshot_comparison_markdown


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    base, pruned = (ZeroShotReport.from_dict(json.loads(Path(path).read_text())) for path in sys.argv[1:])
    print(zeroshot_comparison_markdown(before_after_rows(base, pruned), base.limit))


if __name__ == "__main__":
    main()
