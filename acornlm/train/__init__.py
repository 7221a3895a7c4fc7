"""acornlm.train"""
