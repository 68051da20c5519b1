"""MERIT-style multi-condition queries from labelled products: attribute cards, query composition,
out-of-distribution splits and the MERIT / MegaPairs JSON formats. Pure Python and numpy.
"""
