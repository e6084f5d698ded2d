"""addpipe.eval"""
