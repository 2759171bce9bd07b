"""JSON Schemas (Draft 2020-12) of every kind underlay reads or serves; package data."""
