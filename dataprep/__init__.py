"""addpipe.dataprep"""
