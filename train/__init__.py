"""addpipe.train"""
