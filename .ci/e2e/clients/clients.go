// Go's net/http pointed at tokengate, as the README's "Client recipes" show it. Standard
// library only: `go run clients.go`.
//
// Run by .ci/e2e/clients.sh, which judges the results: each scenario writes $OUT/<id>.txt,
// its first line the HTTP status (or `ERR <what failed>`), the rest the response body.
// TG_BASE is tokengate's listener (base-URL mode), TG_PROXY the same listener as a proxy, API
// the upstream's own URL (what a client calls in proxy mode).
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

var (
	base  = os.Getenv("TG_BASE")
	api   = os.Getenv("API")
	out   = os.Getenv("OUT")
	proxy = os.Getenv("TG_PROXY")
)

func order(id string) []byte {
	b, _ := json.Marshal(map[string]any{"order": map[string]any{"id": id, "items": []int{1, 2, 3}, "note": "Zoë's café"}})
	return b
}

func run(id string, client *http.Client, method, target string, body []byte) {
	line, text := "", ""
	var reader io.Reader
	if body != nil {
		reader = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, target, reader)
	if err == nil {
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		var res *http.Response
		if res, err = client.Do(req); err == nil {
			var b []byte
			b, err = io.ReadAll(res.Body)
			res.Body.Close()
			line, text = fmt.Sprint(res.StatusCode), string(b)
		}
	}
	if err != nil {
		line = "ERR " + strings.ReplaceAll(err.Error(), "\n", " ")
	}
	if err := os.WriteFile(filepath.Join(out, id+".txt"), []byte(line+"\n"+text), 0o644); err != nil {
		panic(err)
	}
}

func main() {
	plain := &http.Client{Timeout: 10 * time.Second}
	run("go-base-get", plain, "GET", base+"/v2/orders?client=go-base-get", nil)
	run("go-base-post", plain, "POST", base+"/echo-body", order("go-base-post"))

	proxyURL, err := url.Parse(proxy)
	if err != nil {
		panic(err)
	}
	proxied := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL)},
	}
	run("go-proxy-get", proxied, "GET", api+"/v2/orders?client=go-proxy-get", nil)
	run("go-proxy-post", proxied, "POST", api+"/echo-body", order("go-proxy-post"))

	// The trap: http.ProxyFromEnvironment (the default transport's Proxy) never proxies a
	// request to localhost or a loopback address, whatever HTTP_PROXY and NO_PROXY say.
	// It reads the environment once, so it is set before the first use.
	os.Setenv("HTTP_PROXY", proxy)
	fromEnv := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{Proxy: http.ProxyFromEnvironment},
	}
	run("go-env-loopback-trap", fromEnv, "GET", api+"/v2/orders?client=go-env-loopback-trap", nil)

	fmt.Println(runtime.Version())
}
