import sys; print("report stub", sys.argv)
