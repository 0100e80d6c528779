// Java's two built-in HTTP clients pointed at tokengate, as the README's "Client recipes"
// show them: java.net.http.HttpClient (Java 11+) and HttpURLConnection. No build tool: run as
// `java Clients.java` (a single-file source program, Java 11+).
//
// Run by .ci/e2e/clients.sh, which judges the results: each scenario writes $OUT/<id>.txt,
// its first line the HTTP status (then, for HttpClient, the protocol version it got) or
// `ERR <what failed>`, the rest the response body. TG_BASE is tokengate's listener (base-URL
// mode), TG_PROXY the same listener as a proxy, API the upstream's own URL (what a client
// calls in proxy mode).

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.InetSocketAddress;
import java.net.Proxy;
import java.net.ProxySelector;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;

public class Clients {
    static final String BASE = System.getenv("TG_BASE");
    static final String API = System.getenv("API");
    static final URI PROXY = URI.create(System.getenv("TG_PROXY"));
    static final Path OUT = Path.of(System.getenv("OUT"));
    static final Duration TIMEOUT = Duration.ofSeconds(10);

    interface Call {
        String[] run() throws Exception;
    }

    static void run(String id, Call call) throws IOException {
        String line;
        String body = "";
        try {
            String[] result = call.run();
            line = result[0];
            body = result[1];
        } catch (Exception e) {
            line = "ERR " + e;
        }
        Files.writeString(OUT.resolve(id + ".txt"), line.replace('\n', ' ') + "\n" + body);
    }

    static String order(String id) {
        return "{\"order\":{\"id\":\"" + id + "\",\"items\":[1,2,3],\"note\":\"Zoë's café\"}}";
    }

    // --- java.net.http.HttpClient ------------------------------------------------------------
    static String[] send(HttpClient client, HttpRequest request) throws Exception {
        HttpResponse<String> res = client.send(request, HttpResponse.BodyHandlers.ofString());
        return new String[] {res.statusCode() + " " + res.version(), res.body()};
    }

    static HttpRequest get(String url) {
        return HttpRequest.newBuilder(URI.create(url)).timeout(TIMEOUT).build();
    }

    static HttpRequest post(String url, String json) {
        return HttpRequest.newBuilder(URI.create(url))
                .timeout(TIMEOUT)
                .header("Content-Type", "application/json")
                .POST(HttpRequest.BodyPublishers.ofString(json))
                .build();
    }

    // --- HttpURLConnection -------------------------------------------------------------------
    static String[] urlConnection(String url, Proxy proxy, String json) throws IOException {
        URI uri = URI.create(url);
        HttpURLConnection c = (HttpURLConnection)
                (proxy == null ? uri.toURL().openConnection() : uri.toURL().openConnection(proxy));
        c.setConnectTimeout((int) TIMEOUT.toMillis());
        c.setReadTimeout((int) TIMEOUT.toMillis());
        if (json != null) {
            c.setRequestMethod("POST");
            c.setDoOutput(true);
            c.setRequestProperty("Content-Type", "application/json");
            try (OutputStream out = c.getOutputStream()) {
                out.write(json.getBytes(StandardCharsets.UTF_8));
            }
        }
        int status = c.getResponseCode();
        InputStream in = status >= 400 ? c.getErrorStream() : c.getInputStream();
        String body = in == null ? "" : new String(in.readAllBytes(), StandardCharsets.UTF_8);
        return new String[] {String.valueOf(status), body};
    }

    public static void main(String[] args) throws Exception {
        InetSocketAddress proxyAddress = new InetSocketAddress(PROXY.getHost(), PROXY.getPort());

        // Default HttpClient: prefers HTTP/2, so on http:// it offers an h2c upgrade, which
        // tokengate declines: the answer comes back over HTTP/1.1.
        HttpClient plain = HttpClient.newBuilder().connectTimeout(TIMEOUT).build();
        run("java-httpclient-base-get", () -> send(plain, get(BASE + "/v2/orders?client=java-httpclient-base-get")));
        HttpClient http11 = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(TIMEOUT)
                .build();
        run("java-httpclient-base-post",
                () -> send(http11, post(BASE + "/echo-body", order("java-httpclient-base-post"))));
        HttpClient proxied = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .proxy(ProxySelector.of(proxyAddress))
                .connectTimeout(TIMEOUT)
                .build();
        run("java-httpclient-proxy-get", () -> send(proxied, get(API + "/v2/orders?client=java-httpclient-proxy-get")));
        run("java-httpclient-proxy-post",
                () -> send(proxied, post(API + "/echo-body", order("java-httpclient-proxy-post"))));

        run("java-urlconnection-base-get",
                () -> urlConnection(BASE + "/v2/orders?client=java-urlconnection-base-get", null, null));
        run("java-urlconnection-base-post",
                () -> urlConnection(BASE + "/echo-body", null, order("java-urlconnection-base-post")));
        Proxy proxy = new Proxy(Proxy.Type.HTTP, proxyAddress);
        run("java-urlconnection-proxy-get",
                () -> urlConnection(API + "/v2/orders?client=java-urlconnection-proxy-get", proxy, null));

        // -Dhttp.proxyHost/-Dhttp.proxyPort, set here as a launcher would (the default
        // ProxySelector reads them on every call). The trap: http.nonProxyHosts defaults to
        // localhost|127.*|[::1]|0.0.0.0|[::0], so a loopback URL goes direct, past tokengate.
        System.setProperty("http.proxyHost", PROXY.getHost());
        System.setProperty("http.proxyPort", String.valueOf(PROXY.getPort()));
        run("java-urlconnection-sysprops-trap",
                () -> urlConnection(API + "/v2/orders?client=java-urlconnection-sysprops-trap", null, null));
        // An HttpClient built without .proxy(...) uses the same default ProxySelector.
        HttpClient systemProxy = HttpClient.newBuilder()
                .version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(TIMEOUT)
                .build();
        run("java-httpclient-sysprops-trap",
                () -> send(systemProxy, get(API + "/v2/orders?client=java-httpclient-sysprops-trap")));
        // The fix: -Dhttp.nonProxyHosts= (empty) drops the default list.
        System.setProperty("http.nonProxyHosts", "");
        run("java-urlconnection-sysprops-get",
                () -> urlConnection(API + "/v2/orders?client=java-urlconnection-sysprops-get", null, null));
        run("java-httpclient-sysprops-get",
                () -> send(systemProxy, get(API + "/v2/orders?client=java-httpclient-sysprops-get")));

        System.out.println("java " + System.getProperty("java.version"));
    }
}
