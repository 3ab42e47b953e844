SELECT tid, tok FROM claim('w1', 1800000000000000) \gset
SELECT complete(:tid, :tok, 1800000000000000);
