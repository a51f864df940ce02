"""Devices: the sharding rule table, mesh and constraints; multi-process start-up."""
