<?php
// PHP's curl extension and Guzzle (Debian's php-guzzlehttp-guzzle) pointed at tokengate, as
// the README's "Client recipes" show them.
//
// Run by .ci/e2e/clients.sh, which judges the results: each scenario writes $OUT/<id>.txt,
// its first line the HTTP status (or `ERR <what failed>`), the rest the response body.
// TG_BASE is tokengate's listener (base-URL mode), TG_PROXY the same listener as a proxy, API
// the upstream's own URL (what a client calls in proxy mode).

$base = getenv('TG_BASE');
$proxy = getenv('TG_PROXY');
$api = getenv('API');
$out = getenv('OUT');

function order(string $id): array {
    return ['order' => ['id' => $id, 'items' => [1, 2, 3], 'note' => "Zoë's café"]];
}

function call(string $id, string $url, array $options = []): void {
    global $out;
    $ch = curl_init($url);
    curl_setopt_array($ch, [CURLOPT_RETURNTRANSFER => true, CURLOPT_TIMEOUT => 10] + $options);
    $body = curl_exec($ch);
    $line = $body === false ? 'ERR ' . curl_error($ch) : (string) curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
    curl_close($ch);
    file_put_contents("$out/$id.txt", $line . "\n" . ($body === false ? '' : $body));
}

function post(array $body): array {
    return [
        CURLOPT_POST => true,
        CURLOPT_POSTFIELDS => json_encode($body),
        CURLOPT_HTTPHEADER => ['Content-Type: application/json'],
    ];
}

call('php-curl-base-get', "$base/v2/orders?client=php-curl-base-get");
call('php-curl-base-post', "$base/echo-body", post(order('php-curl-base-post')));
call('php-curl-proxy-get', "$api/v2/orders?client=php-curl-proxy-get", [CURLOPT_PROXY => $proxy]);
call('php-curl-proxy-post', "$api/echo-body", [CURLOPT_PROXY => $proxy] + post(order('php-curl-proxy-post')));

// --- Guzzle ----------------------------------------------------------------------------------
require '/usr/share/php/GuzzleHttp/autoload.php';

function guzzle(string $id, GuzzleHttp\Client $client, string $method, string $uri, array $options = []): void {
    global $out;
    try {
        $res = $client->request($method, $uri, $options + ['http_errors' => false, 'timeout' => 10]);
        $text = $res->getStatusCode() . "\n" . $res->getBody();
    } catch (Throwable $e) {
        $text = 'ERR ' . str_replace("\n", ' ', $e->getMessage()) . "\n";
    }
    file_put_contents("$out/$id.txt", $text);
}

$base_client = new GuzzleHttp\Client(['base_uri' => $base]);
guzzle('php-guzzle-base-get', $base_client, 'GET', '/v2/orders', ['query' => ['client' => 'php-guzzle-base-get']]);
guzzle('php-guzzle-base-post', $base_client, 'POST', '/echo-body', ['json' => order('php-guzzle-base-post')]);
$proxy_client = new GuzzleHttp\Client(['proxy' => ['http' => $proxy]]);
guzzle('php-guzzle-proxy-post', $proxy_client, 'POST', "$api/echo-body", ['json' => order('php-guzzle-proxy-post')]);
// On the command line (only there) Guzzle takes HTTP_PROXY from the environment, when the
// client is made.
putenv("HTTP_PROXY=$proxy");
$env_client = new GuzzleHttp\Client();
putenv('HTTP_PROXY');
guzzle('php-guzzle-env-get', $env_client, 'GET', "$api/v2/orders", ['query' => ['client' => 'php-guzzle-env-get']]);

echo 'php ' . PHP_VERSION . ', libcurl ' . curl_version()['version'] . ', Guzzle ' . GuzzleHttp\ClientInterface::MAJOR_VERSION . "\n";
