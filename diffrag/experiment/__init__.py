"""What makes a comparison trustworthy, shared by `diffrag rag`, `diffrag gr`, `make bench` and experiments/.

- `store`: trained artefacts in folders keyed by a hash of everything that made them;
- `provenance`: content fingerprints and the `manifest.json` of every run;
- `timing`: steady-state timing with compilation apart, and a count of compilations;
- `stats`: paired bootstrap intervals and randomization tests.
"""

from diffrag.experiment import provenance, stats, store, timing
from diffrag.experiment.provenance import fingerprint, write_manifest
from diffrag.experiment.store import Artefact, ArtefactStore
from diffrag.experiment.timing import Stopwatch, count_compiles

__all__ = ["Artefact", "ArtefactStore", "Stopwatch", "count_compiles", "fingerprint", "provenance", "stats", "store",
           "timing", "write_manifest"]
