# Turns bench/run.sh's raw results (TSV, one line per measurement) into the Markdown tables
# of bench/RESULTS.md. Plain POSIX awk (Debian's default mawk has no asort).
#
# Per cell (upstream × payload × connections × target): medians over rounds. Ratios are
# taken within a round first (the targets of one cell run back to back), then the median of
# those ratios is shown: on a shared, noisy machine that cancels most of the drift.
#
# Input: a header line naming the columns, then one line per measurement: round upstream
# payload conns target requests duration_us p50_us p99_us err_connect err_read err_write
# err_status err_timeout cpu_ticks rss_kib minflt ctxsw; -v clk=CLK_TCK. Columns are found by
# their names in the header, so a TSV from before a column was added still reads (that
# column shows "–").

function sort_num(arr, n,    i, j, x) {
    for (i = 2; i <= n; i++) {
        x = arr[i]; j = i - 1
        while (j > 0 && arr[j] + 0 > x + 0) { arr[j + 1] = arr[j]; j-- }
        arr[j + 1] = x
    }
}
function median(list,    a, n) {
    n = split(list, a, " ")
    if (n == 0) return ""
    sort_num(a, n)
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function maximum(list,    a, n, i, m) {
    n = split(list, a, " ")
    if (n == 0) return ""
    m = a[1]
    for (i = 2; i <= n; i++) if (a[i] + 0 > m + 0) m = a[i]
    return m
}
function add(arr, key, value) { arr[key] = (key in arr) ? arr[key] " " value : value }
function fmt(v, f) { return (v == "") ? "–" : sprintf(f, v) }
# Counts per 1000 requests: whole numbers from 100 up, one decimal below.
function fmt_k(v) { return (v == "") ? "–" : sprintf((v >= 100) ? "%.0f" : "%.1f", v) }
# The named column of the current line ("" when the TSV has no such column).
function col(name) { return (name in colno) ? $(colno[name]) : "" }
# Per 1000 requests of a count column, or "" without one.
function per_kreq(name, req,    v) { v = col(name); return (v != "" && req > 0) ? v * 1000 / req : "" }
function remember(list_name, value) {
    if (!((list_name SUBSEP value) in seen)) {
        seen[list_name SUBSEP value] = 1
        order[list_name] = (list_name in order) ? order[list_name] " " value : value
    }
}
function payload_name(p) {
    return (p == "get") ? "small GET (217-byte JSON)" : (p == "post") ? "64 KiB POST" : (p == "big") ? "1 MiB response" : p
}
function upstream_name(u) {
    if (u == "plain") return "plain-HTTP upstream"
    if (u == "tls") return "HTTPS upstream"
    if (u == "h2") return "HTTPS upstream speaking h2 (tokengate and floor only; nginx cannot proxy over h2)"
    return u " upstream"
}
# Ratio of two targets' metric in one round, added to the ratio list of the cell.
function ratio(r, cell, a, b, metric, name,    ka, kb) {
    ka = r SUBSEP cell SUBSEP a; kb = r SUBSEP cell SUBSEP b
    if ((ka in val_ok) && (kb in val_ok) && val[kb, metric] > 0 && val[ka, metric] != "")
        add(ratios, cell SUBSEP name, val[ka, metric] / val[kb, metric])
}
function diff(r, cell, a, b, metric, name,    ka, kb) {
    ka = r SUBSEP cell SUBSEP a; kb = r SUBSEP cell SUBSEP b
    if ((ka in val_ok) && (kb in val_ok))
        add(ratios, cell SUBSEP name, val[ka, metric] - val[kb, metric])
}

# Targets: does value v pass the rule (op "ge" or "le" against lim), compared at 2 decimals.
function passes(v, op, lim,    x) {
    x = sprintf("%.2f", v) + 0
    return (op == "ge") ? x >= lim : x <= lim
}
function rule_op(m) { return (m == "rps") ? "ge" : "le" }
function rule_text(m) {
    if (m == "rps") return "req/s tg/ngx ≥ 0.95"
    if (m == "cpu") return "CPU µs/req tg/ngx ≤ 1.00"
    if (m == "p99") return "p99 ms tg/ngx ≤ 1.00"
    return "peak RSS MiB tg/ngx ≤ 1.00"
}
function metric_list(key, m) {
    return (m == "rps") ? L_rps[key] : (m == "cpu") ? L_cpu[key] : (m == "p99") ? L_p99[key] : L_rss[key]
}
function metric_fmt(m) { return (m == "rps") ? "%.0f" : (m == "p99") ? "%.3f" : "%.1f" }
function verdict_row(name, rule, tg, ngx, fl, r_tn, r_fn, r_tf, verdict) {
    n_checks++; n_verdict[verdict == "met" || verdict == "met via floor" || verdict == "not measured" ? verdict : "missed"]++
    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", name, rule, tg, ngx, fl, r_tn, r_fn, r_tf,
        (verdict ~ /^missed/) ? "**" verdict "**" : verdict
}
# One rule against nginx in one cell, with the floor rule for a miss.
function check(cell, name, m,    op, lim, tol, tn, fn, tf, v, f) {
    op = rule_op(m); lim = (m == "rps") ? 0.95 : 1.00; tol = (m == "rps") ? 0.95 : 1.05
    tn = median(ratios[cell, m "_tg_ngx"]); fn = median(ratios[cell, m "_fl_ngx"]); tf = median(ratios[cell, m "_tg_fl"])
    f = metric_fmt(m)
    if (tn == "") v = "not measured"
    else if (passes(tn, op, lim)) v = "met"
    else if (fn == "") v = "missed (no floor measured)"
    else if (passes(fn, op, lim)) v = "missed (the floor meets it)"
    else if (tf != "" && passes(tf, op, tol)) v = "met via floor"
    else v = "missed (the floor misses too; tokengate not within 5 % of it)"
    verdict_row(name, rule_text(m), fmt(median(metric_list(cell SUBSEP "tokengate", m)), f),
        fmt(median(metric_list(cell SUBSEP "nginx", m)), f), fmt(median(metric_list(cell SUBSEP "floor", m)), f),
        fmt(tn, "%.2f"), fmt(fn, "%.2f"), fmt(tf, "%.2f"), v)
}
# Peak RSS against a fixed limit in MiB (max over rounds), with the floor rule for a miss.
function check_rss_abs(cell, name, lim,    tg, fl, tf, v) {
    tg = maximum(L_rss[cell SUBSEP "tokengate"]); fl = maximum(L_rss[cell SUBSEP "floor"])
    tf = median(ratios[cell, "rss_tg_fl"])
    if (tg == "") v = "not measured"
    else if (sprintf("%.1f", tg) + 0 <= lim) v = "met"
    else if (fl == "") v = "missed (no floor measured)"
    else if (sprintf("%.1f", fl) + 0 <= lim) v = "missed (the floor meets it)"
    else if (tf != "" && passes(tf, "le", 1.05)) v = "met via floor"
    else v = "missed (the floor misses too; tokengate not within 5 % of it)"
    verdict_row(name, "peak RSS MiB ≤ " lim, fmt(tg, "%.1f"), "–", fmt(fl, "%.1f"), "–", "–", fmt(tf, "%.2f"), v)
}

NR == 1 { for (i = 1; i <= NF; i++) colno[$i] = i; next }
{
    r = col("round"); up = col("upstream"); pl = col("payload"); c = col("conns"); t = col("target")
    req = col("requests"); dur = col("duration_us"); p50 = col("p50_us"); p99 = col("p99_us")
    rps = (dur > 0) ? req / (dur / 1e6) : 0
    errs = col("err_connect") + col("err_read") + col("err_write") + col("err_status") + col("err_timeout")
    cpu = (col("cpu_ticks") != "" && req > 0) ? col("cpu_ticks") / clk * 1e6 / req : ""
    rss = (col("rss_kib") != "") ? col("rss_kib") / 1024 : ""
    flt = per_kreq("minflt", req); csw = per_kreq("ctxsw", req)
    cell = up SUBSEP pl SUBSEP c
    key = cell SUBSEP t
    add(L_rps, key, rps); add(L_p50, key, p50 / 1000); add(L_p99, key, p99 / 1000)
    if (cpu != "") add(L_cpu, key, cpu)
    if (rss != "") add(L_rss, key, rss)
    if (flt != "") add(L_flt, key, flt)
    if (csw != "") add(L_csw, key, csw)
    E[key] += errs
    total_errors += errs
    rk = r SUBSEP cell SUBSEP t
    val_ok[rk] = 1
    val[rk, "rps"] = rps; val[rk, "p50"] = p50; val[rk, "p99"] = p99; val[rk, "cpu"] = cpu; val[rk, "rss"] = rss
    rounds[r] = 1
    remember("up", up); remember("pl", pl); remember("c", c); remember("t", t)
    has_cell[cell] = 1
}
END {
    nr = 0; for (r in rounds) nr++
    # Fixed target order; only those present are shown.
    nt = 0
    ntc = split("direct nginx tokengate floor nginx-log tokengate-log tg-compare", tcand, " ")
    for (i = 1; i <= ntc; i++) if (("t" SUBSEP tcand[i]) in seen) targets[++nt] = tcand[i]
    nu = split(order["up"], ups, " ")
    np = split(order["pl"], pls, " ")
    nc = split(order["c"], cs, " "); sort_num(cs, nc)

    split("rps cpu p99 rss", M, " ")
    # Per-round ratios.
    for (r in rounds) for (cell in has_cell) {
        ratio(r, cell, "tokengate", "nginx", "rps", "rps_tg_ngx")
        ratio(r, cell, "tokengate", "direct", "rps", "rps_tg_dir")
        ratio(r, cell, "nginx", "direct", "rps", "rps_ngx_dir")
        ratio(r, cell, "tokengate", "nginx", "p99", "p99_tg_ngx")
        ratio(r, cell, "tokengate", "nginx", "cpu", "cpu_tg_ngx")
        diff(r, cell, "tokengate", "direct", "p50", "p50add_tg")
        diff(r, cell, "nginx", "direct", "p50", "p50add_ngx")
        ratio(r, cell, "tokengate-log", "nginx-log", "rps", "rps_tgl_ngxl")
        ratio(r, cell, "tokengate-log", "nginx-log", "cpu", "cpu_tgl_ngxl")
        ratio(r, cell, "tokengate-log", "nginx", "cpu", "cpu_tgl_ngx")
        ratio(r, cell, "tg-compare", "tokengate", "cpu", "cpu_cmp_tg")
        ratio(r, cell, "tg-compare", "tokengate", "rps", "rps_cmp_tg")
        # tokengate against the floor (its own cost), the floor against nginx (hyper's), and
        # the peak RSS pairs, for the Targets section.
        for (mi = 1; mi <= 4; mi++) {
            ratio(r, cell, "tokengate", "floor", M[mi], M[mi] "_tg_fl")
            ratio(r, cell, "floor", "nginx", M[mi], M[mi] "_fl_ngx")
        }
        ratio(r, cell, "tokengate", "nginx", "rss", "rss_tg_ngx")
    }

    printf "## Results (median of %d round%s)\n\n", nr, (nr == 1 ? "" : "s")
    print "req/s and latency as wrk saw them; errors = socket errors + responses >= 400, summed over rounds; CPU = the proxy's utime+stime over the measurement divided by the requests served; peak RSS = VmHWM during the measurement (nginx: master + worker); faults = minor page faults (minflt) and ctxsw = context switches (voluntary + involuntary, all threads) of the proxy over the measurement, per 1000 requests served."
    for (u = 1; u <= nu; u++) for (p = 1; p <= np; p++) {
        shown = 0
        for (ci = 1; ci <= nc; ci++) if ((ups[u] SUBSEP pls[p] SUBSEP cs[ci]) in has_cell) shown = 1
        if (!shown) continue
        printf "\n### %s, %s\n\n", upstream_name(ups[u]), payload_name(pls[p])
        if (ups[u] == "h2") print "tokengate and the floor speak h2 to the upstream; direct is wrk's HTTP/1.1 over TLS to the same port (wrk speaks no h2).\n"
        print "| conns | target | req/s | p50 ms | p99 ms | errors | CPU µs/req | peak RSS MiB | faults/1k req | ctxsw/1k req |"
        print "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        for (ci = 1; ci <= nc; ci++) for (ti = 1; ti <= nt; ti++) {
            key = ups[u] SUBSEP pls[p] SUBSEP cs[ci] SUBSEP targets[ti]
            if (!(key in L_rps)) continue
            printf "| %s | %s | %s | %s | %s | %d | %s | %s | %s | %s |\n", cs[ci], targets[ti],
                fmt(median(L_rps[key]), "%.0f"), fmt(median(L_p50[key]), "%.3f"),
                fmt(median(L_p99[key]), "%.3f"), E[key],
                fmt(median(L_cpu[key]), "%.1f"), fmt(median(L_rss[key]), "%.1f"),
                fmt_k(median(L_flt[key])), fmt_k(median(L_csw[key]))
        }
    }

    print "\n## Ratios (median over rounds of the per-round ratio)\n"
    print "tg = tokengate, ngx = nginx, dir = direct, floor = hyper alone with tokengate's connection strategy (tg/floor is tokengate's own cost). \"p50 added\" is the proxy's p50 minus direct's, in µs. The targets are under Targets below; \"–\" where a target was not measured."
    print ""
    hdr = "| upstream | payload | conns | req/s tg/ngx | req/s tg/dir | req/s ngx/dir | p99 tg/ngx | CPU tg/ngx | req/s tg/floor | CPU tg/floor | p99 tg/floor | p50 added tg | p50 added ngx | req/s tg-log/ngx-log | CPU tg-log/ngx-log | CPU tg-log/ngx |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    has_cmp = ("t" SUBSEP "tg-compare") in seen
    if (has_cmp) { hdr = hdr " req/s compare/tg | CPU compare/tg |"; sep = sep "---:|---:|" }
    print hdr; print sep
    for (u = 1; u <= nu; u++) for (p = 1; p <= np; p++) for (ci = 1; ci <= nc; ci++) {
        cell = ups[u] SUBSEP pls[p] SUBSEP cs[ci]
        if (!(cell in has_cell)) continue
        line = sprintf("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |", ups[u], pls[p], cs[ci],
            fmt(median(ratios[cell, "rps_tg_ngx"]), "%.2f"), fmt(median(ratios[cell, "rps_tg_dir"]), "%.2f"),
            fmt(median(ratios[cell, "rps_ngx_dir"]), "%.2f"),
            fmt(median(ratios[cell, "p99_tg_ngx"]), "%.2f"), fmt(median(ratios[cell, "cpu_tg_ngx"]), "%.2f"),
            fmt(median(ratios[cell, "rps_tg_fl"]), "%.2f"), fmt(median(ratios[cell, "cpu_tg_fl"]), "%.2f"),
            fmt(median(ratios[cell, "p99_tg_fl"]), "%.2f"),
            fmt(median(ratios[cell, "p50add_tg"]), "%.0f"), fmt(median(ratios[cell, "p50add_ngx"]), "%.0f"),
            fmt(median(ratios[cell, "rps_tgl_ngxl"]), "%.2f"), fmt(median(ratios[cell, "cpu_tgl_ngxl"]), "%.2f"),
            fmt(median(ratios[cell, "cpu_tgl_ngx"]), "%.2f"))
        if (has_cmp) line = line sprintf(" %s | %s |", fmt(median(ratios[cell, "rps_cmp_tg"]), "%.2f"), fmt(median(ratios[cell, "cpu_cmp_tg"]), "%.2f"))
        print line
    }

    print "\n## Targets\n"
    print "Per cell of this run (a cell the run did not measure is not checked); ratios as above, compared at the two decimals shown. tokengate against nginx:"
    print ""
    print "- small GET, plain and HTTPS upstream, 16, 64 and 256 connections: req/s tg/ngx ≥ 0.95, p99 tg/ngx ≤ 1.00, CPU tg/ngx ≤ 1.00;"
    print "- 64 KiB POST and 1 MiB response, plain and HTTPS upstream, every connection count: CPU tg/ngx ≤ 1.00;"
    print "- peak RSS at 256 connections, small GET and 64 KiB POST: tokengate ≤ nginx (master + worker) with the plain and HTTPS upstreams, ≤ 16 MiB (max over rounds) with the h2 upstream."
    print ""
    print "A miss is out of hyper's reach when the floor misses the same target in the same cell (floor against nginx, same rule); it is then met via the floor if tokengate is within 5 % of the floor there (req/s tg/floor ≥ 0.95, CPU, p99 and RSS tg/floor ≤ 1.05). Values are the medians of the tables above (units in the rule column)."
    print ""
    print "| cell | rule | tokengate | nginx | floor | tg/ngx | floor/ngx | tg/floor | verdict |"
    print "|---|---|---:|---:|---:|---:|---:|---:|---|"
    for (u = 1; u <= nu; u++) for (p = 1; p <= np; p++) for (ci = 1; ci <= nc; ci++) {
        cell = ups[u] SUBSEP pls[p] SUBSEP cs[ci]
        if (!(cell in has_cell)) continue
        name = ups[u] " " pls[p] " c=" cs[ci]
        h1 = (ups[u] == "plain" || ups[u] == "tls")
        if (h1 && pls[p] == "get" && cs[ci] >= 16) {
            check(cell, name, "rps"); check(cell, name, "p99"); check(cell, name, "cpu")
        }
        if (h1 && (pls[p] == "post" || pls[p] == "big")) check(cell, name, "cpu")
        if (h1 && (pls[p] == "get" || pls[p] == "post") && cs[ci] == 256) check(cell, name, "rss")
        if (ups[u] == "h2" && (pls[p] == "get" || pls[p] == "post") && cs[ci] == 256) check_rss_abs(cell, name, 16)
    }
    ncells = 0; nerr = 0; errlist = ""
    for (u = 1; u <= nu; u++) for (p = 1; p <= np; p++) for (ci = 1; ci <= nc; ci++) {
        cell = ups[u] SUBSEP pls[p] SUBSEP cs[ci]
        if (!(cell in has_cell)) continue
        ncells++; cell_errs = ""
        for (ti = 1; ti <= nt; ti++) if ((cell SUBSEP targets[ti]) in E && E[cell, targets[ti]] > 0)
            cell_errs = cell_errs (cell_errs == "" ? "" : ", ") targets[ti] " " E[cell, targets[ti]]
        if (cell_errs != "") { nerr++; errlist = errlist sprintf("  - %s %s c=%s: %s\n", ups[u], pls[p], cs[ci], cell_errs) }
    }
    print ""
    if (nerr == 0) printf "- Errors: none in any cell (%d cell%s; target: 0 in every cell)\n", ncells, (ncells == 1 ? "" : "s")
    else printf "- Errors (target: 0 in every cell): in %d of %d cells, %d in all:\n%s", nerr, ncells, total_errors, errlist
    # run.sh's line on the kernel's listen-queue drops, which it counts and awk cannot.
    if (ENVIRON["BENCH_OVERFLOWS"] != "") print ENVIRON["BENCH_OVERFLOWS"]
    printf "- %d target checks: %d met, %d met via floor, %d missed, %d not measured\n",
        n_checks, n_verdict["met"], n_verdict["met via floor"], n_verdict["missed"], n_verdict["not measured"]
}
