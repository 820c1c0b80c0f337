"""The demo's data: a small bundled sample of real OCT scans (see ATTRIBUTION.md).

Data only, importing nothing of the package: `retinalens demo` is run by cli/demo.py.
"""

from pathlib import Path

DEMO_DATA = Path(__file__).parent / "data"
