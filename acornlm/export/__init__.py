"""acornlm.export"""
