"""Utilities around generated and training maps: writing ready-to-play maps, v3 chains → notes, grid snapping,
tempo/phase estimation, songs from links, previews, and the map-quality score card."""

# ---- map writing, chains, snapping, tempo, downloads, previews (issue 4) ----


# ---- score card (issue 6) ----
