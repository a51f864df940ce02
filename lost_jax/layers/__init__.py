"""Projection layers (dense, LOST, low-rank / CoLA, SLTrain) and the factory that picks one."""
