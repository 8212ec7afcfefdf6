"""Published numbers of the reference study, shipped as package data (see microscope.yaml)."""
