"""finer: the FINER fine-grained negative-query benchmark and FINER-Tuning (DPO) on VLMs."""
