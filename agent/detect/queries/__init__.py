"""Black-box query detection: per client, in the request path (Chen, Carlini and Wagner 2019; Blacklight,
Li et al., USENIX Security 2022).

``fingerprint``  Fingerprinter: quantise a row, hash its windows with a secret key, keep the largest hashes
``clients``      ClientHistory and ClientTable: each client's recent fingerprints in bounded memory, the flag
``watch``        QueryWatch: the data plane's QueryChecks (flag and enforce), metrics, the throttled log
"""
