"""Units of work: sources, processing, storage, monitoring and real time."""

import pandas as pd

# pandas' Copy-on-Write, pandas 3's default and the mode the whole application is written and
# measured under: a frame a step returns shares the columns it left alone, and a write copies.
# Set here, where every flow's imports pass, not left to whichever library happens to set it.
pd.options.mode.copy_on_write = True
