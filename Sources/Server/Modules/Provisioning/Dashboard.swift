import HTTPTypes
import Hummingbird
import NIOCore

/// The operator dashboard: one page (`/dashboard`), its script and its style sheet, served by
/// the HTTPS listener next to the provisioning API, whose tokens and endpoints it uses
/// (`/status`, `/domains`, `/links`, `/domains/{domain}/check`; docs/provisioning-api.md).
///
/// The three files are constants and carry no data: everything shown comes from the API
/// with the token the operator gives, so serving them needs no token. The script is the
/// only code the page runs (CSP `script-src 'self'`, no inline script), it builds the page
/// with DOM calls and `textContent` (domain names and JIDs are never parsed as HTML), and it
/// sends the token only as an `Authorization` header, never as a cookie (see the script's
/// first comment on CSRF).
enum Dashboard {
    static let path = "/dashboard"

    /// Nothing but this origin's script, style sheet and API; no framing, no form posts.
    static let contentSecurityPolicy =
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        + "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

    static func install(on router: Hummingbird.Router<BasicRequestContext>) {
        router.get(RouterPath(path)) { _, _ in response(html, type: "text/html; charset=utf-8") }
        router.get("\(path)/app.js") { _, _ in response(script, type: "text/javascript; charset=utf-8") }
        router.get("\(path)/app.css") { _, _ in response(styleSheet, type: "text/css; charset=utf-8") }
    }

    static func response(_ text: String, type: String) -> Response {
        let bytes = ByteBuffer(string: text)
        return Response(status: .ok, headers: ProvisioningAPI.headers([
            ("Content-Type", type), ("Content-Length", "\(bytes.readableBytes)"),
            ("Content-Security-Policy", contentSecurityPolicy),
            ("X-Content-Type-Options", "nosniff"),
            // Older browsers ignore frame-ancestors.
            ("X-Frame-Options", "DENY"),
            ("Referrer-Policy", "no-referrer"),
            // The page is small and changes with the server: never a stale script.
            ("Cache-Control", "no-store"),
        ]), body: ResponseBody(byteBuffer: bytes))
    }

    // MARK: The page

    static let html = #"""
    <!doctype html>
    <html lang="en">
    <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <meta name="referrer" content="no-referrer">
    <title>Braid — operator dashboard</title>
    <link rel="icon" href="data:,">
    <link rel="stylesheet" href="/dashboard/app.css">
    <script src="/dashboard/app.js" defer></script>
    </head>
    <body data-state="loading">
    <header>
      <h1>Braid</h1>
      <span id="scope"></span>
      <span id="updated"></span>
      <button id="logout" type="button" hidden>Log out</button>
    </header>
    <p id="message" role="status"></p>
    <section id="login" hidden>
      <h2>Log in</h2>
      <form id="login-form">
        <label for="token">Provisioning API token</label>
        <input id="token" type="password" autocomplete="off" spellcheck="false" placeholder="braid_…" required>
        <button type="submit">Log in</button>
      </form>
      <p class="note">A token from <code>braid api token add</code>: provider-wide for everything, or scoped to a
        customer's domains. It stays in this tab only and is sent only to this server's API.</p>
    </section>
    <main id="main" hidden>
      <section id="overview" class="cards" aria-label="Overview"></section>
      <section>
        <h2>Charts</h2>
        <div id="charts" class="charts"></div>
      </section>
      <section>
        <h2>Domains</h2>
        <input id="domain-filter" type="search" placeholder="Filter domains" aria-label="Filter domains">
        <div id="domains"></div>
      </section>
      <section>
        <h2>Online sessions</h2>
        <div id="sessions"></div>
      </section>
      <section>
        <h2>Federation links</h2>
        <div id="links"></div>
      </section>
      <section>
        <h2>Connections saved</h2>
        <div id="connections"></div>
      </section>
      <section>
        <h2>Security</h2>
        <div id="security"></div>
      </section>
    </main>
    </body>
    </html>

    """#

    // MARK: The script

    static let script = #"""
    'use strict';
    // Braid operator dashboard.
    //
    // CSRF: the token is kept in sessionStorage (this tab only, gone when it closes) and sent
    // only as an `Authorization: Bearer` header by fetch(). The server sets no cookie and
    // reads none, so a page on another site has no ambient credential to make the browser
    // use: cross-site request forgery has nothing to ride on. A token given in the URL
    // fragment (/dashboard#token=…, for scripts) never reaches the server or a Referer; it is
    // moved to sessionStorage and taken out of the address bar.
    //
    // XSS: every string from the server (domain names, JIDs, link ids, audit details) is
    // shown through textContent or text nodes, never parsed as markup.
    (() => {
      const API = '/api/v1';
      const POLL_MS = 5000;
      const HISTORY = 60;
      const STORAGE_KEY = 'braid-dashboard-token';
      const DOMAINS_SHOWN = 200;
      const SVG = 'http://www.w3.org/2000/svg';
      const MARK = { ok: '✔', warning: '!', error: '✘' };

      const state = {
        token: null, timer: null, refreshing: false,
        status: null, domains: [], links: null, history: [],
        checks: new Map(), checking: new Set(),
      };

      const byId = (id) => document.getElementById(id);

      // An element with attributes (constant names; values set as attributes, not markup)
      // and children (nodes, or strings as text).
      function el(tag, attributes, ...children) {
        const node = document.createElement(tag);
        for (const [name, value] of Object.entries(attributes || {})) {
          if (name === 'class') node.className = value; else node.setAttribute(name, String(value));
        }
        append(node, children);
        return node;
      }

      function svg(tag, attributes, ...children) {
        const node = document.createElementNS(SVG, tag);
        for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
        append(node, children);
        return node;
      }

      function append(node, children) {
        for (const child of children.flat()) {
          if (child === null || child === undefined) continue;
          node.append(child instanceof Node ? child : document.createTextNode(String(child)));
        }
      }

      // Replaces a node's children (null and undefined ones left out).
      function fill(node, ...children) {
        node.replaceChildren();
        append(node, children);
      }

      const number = (value) => (typeof value === 'number' ? value.toLocaleString('en') : '–');
      const rate = (value) => (value >= 10 ? value.toFixed(0) : value.toFixed(1));
      const time = (ms) => new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
      const empty = (text) => el('p', { class: 'empty' }, text);

      function table(headers, rows, attributes) {
        return el('table', attributes || {},
          el('thead', {}, el('tr', {}, headers.map((header) => el('th', { scope: 'col' }, header)))),
          el('tbody', {}, rows.map((row) => el('tr', {}, row.map((cell) => el('td', {}, cell))))));
      }

      // Two columns: what, and how much.
      function facts(rows) {
        return el('table', { class: 'facts' },
          el('tbody', {}, rows.map(([what, value]) => el('tr', {}, el('th', { scope: 'row' }, what), el('td', {}, value)))));
      }

      function setMessage(text, kind) {
        const message = byId('message');
        message.textContent = text || '';
        message.className = kind || '';
      }

      // MARK: API

      async function api(path) {
        const token = state.token;
        const response = await fetch(API + path, {
          headers: { Authorization: 'Bearer ' + token, Accept: 'application/json' },
          credentials: 'omit', cache: 'no-store', redirect: 'error',
        });
        if (response.status === 401) {
          if (token === state.token) logout('The token was refused (unknown or revoked). Log in again.');
          throw new Error('unauthenticated');
        }
        let body = null;
        try { body = await response.json(); } catch (error) { body = null; }
        if (!response.ok) throw new Error((body && body.message) || 'HTTP ' + response.status);
        return { body, response };
      }

      // MARK: Log in and out

      function showLogin(message) {
        byId('main').hidden = true;
        byId('logout').hidden = true;
        byId('login').hidden = false;
        byId('scope').textContent = '';
        byId('updated').textContent = '';
        document.body.dataset.state = 'login';
        setMessage(message, message ? 'error' : '');
        byId('token').focus();
      }

      function logout(message) {
        if (state.timer !== null) clearInterval(state.timer);
        Object.assign(state, { token: null, timer: null, status: null, domains: [], links: null, history: [] });
        state.checks.clear();
        state.checking.clear();
        sessionStorage.removeItem(STORAGE_KEY);
        showLogin(message);
      }

      function start(token) {
        state.token = token;
        sessionStorage.setItem(STORAGE_KEY, token);
        byId('login').hidden = true;
        byId('main').hidden = false;
        byId('logout').hidden = false;
        setMessage('');
        state.timer = setInterval(refresh, POLL_MS);
        return refresh();
      }

      // MARK: Polling

      async function refresh() {
        if (state.refreshing || !state.token) return;
        state.refreshing = true;
        const token = state.token;
        try {
          const status = (await api('/status')).body;
          const [domains, links] = await Promise.all([
            api('/domains').then((answer) => answer.body.domains || []),
            status.scope === 'provider' ? api('/links').then((answer) => answer.body.links || []) : Promise.resolve(null),
          ]);
          if (token !== state.token) return;
          Object.assign(state, { status, domains, links });
          record(status);
          render();
          byId('scope').textContent = status.scope === 'provider' ? 'provider-wide token' : 'token scoped to its domains';
          byId('updated').textContent = 'updated ' + time(status.time);
          document.body.dataset.state = 'ready';
          setMessage('');
        } catch (error) {
          if (state.token && error.message !== 'unauthenticated') setMessage('Could not refresh: ' + error.message, 'error');
        } finally {
          state.refreshing = false;
        }
      }

      // One point per poll for the charts; rates from the counters' growth over the
      // server's clock.
      function record(status) {
        const stanzas = status.stanzas;
        const point = {
          time: status.time,
          sessions: status.sessions.online,
          links: status.links ? status.links.open : null,
          pairs: status.links ? status.links.pairs : null,
          totals: stanzas ? [stanzas.client_in_total, stanzas.client_out_total, stanzas.s2s_in_total, stanzas.s2s_out_total] : null,
          rates: null,
        };
        const previous = state.history[state.history.length - 1];
        if (previous && previous.totals && point.totals && point.time > previous.time) {
          const seconds = (point.time - previous.time) / 1000;
          point.rates = point.totals.map((total, index) => Math.max(0, (total - previous.totals[index]) / seconds));
        }
        state.history.push(point);
        if (state.history.length > HISTORY) state.history.shift();
      }

      // MARK: Rendering

      function render() {
        const status = state.status;
        if (!status) return;
        renderOverview(status);
        renderCharts(status);
        renderDomains();
        renderSessions(status);
        renderLinks();
        renderConnections(status);
        renderSecurity(status);
      }

      function card(label, value, note) {
        return el('div', { class: 'card' }, el('div', { class: 'value' }, value), el('div', { class: 'label' }, label),
          note ? el('div', { class: 'note' }, note) : null);
      }

      function renderOverview(status) {
        const cards = [card('Hosted domains', number(status.hosted_domains)), card('Online sessions', number(status.sessions.online))];
        if (status.links) {
          cards.push(card('Federation links', number(status.links.open), number(status.links.pairs) + ' pair authorisations'));
          cards.push(card('Connections saved', number(status.links.saved_now),
            'classic federation: ' + number(status.links.classic_connections) + ' connections'));
        }
        if (status.certificates) {
          const expiry = status.certificates.earliest_expiry;
          cards.push(expiry
            ? card('First certificate expiry', Math.floor((expiry * 1000 - status.time) / 86400000) + ' days', time(expiry * 1000))
            : card('First certificate expiry', '–', 'no certificate loaded'));
        }
        fill(byId('overview'), ...cards);
      }

      function renderDomains() {
        const box = byId('domains');
        if (!state.domains.length) { fill(box, empty('No hosted domains.')); return; }
        const filter = byId('domain-filter').value.trim().toLowerCase();
        const matching = state.domains.filter((domain) => !filter || domain.name.includes(filter));
        const shown = matching.slice(0, DOMAINS_SHOWN);
        const body = el('tbody');
        for (const domain of shown) {
          const name = domain.name;
          const checking = state.checking.has(name);
          const button = el('button', { type: 'button', class: 'check' }, checking ? 'Checking…' : 'Check');
          button.disabled = checking;
          button.addEventListener('click', () => runCheck(name));
          const checked = state.checks.get(name);
          const worst = checked ? worstStatus(checked.report) : null;
          body.append(el('tr', {},
            el('td', { class: 'domain' }, name),
            el('td', {}, (domain.services || []).join(', ')),
            el('td', {}, worst ? el('span', { class: 'badge ' + worst }, MARK[worst] + ' ' + worst) : '–'),
            el('td', {}, button)));
          if (checked) body.append(el('tr', { class: 'check-results' }, el('td', { colspan: 4 }, renderReport(checked))));
        }
        const head = el('thead', {}, el('tr', {}, ['Domain', 'Service domains', 'Check', ''].map((header) => el('th', { scope: 'col' }, header))));
        fill(box, el('table', { class: 'domains' }, head, body),
          matching.length > shown.length ? el('p', { class: 'note' }, number(matching.length - shown.length) + ' more; filter to find them.') : null,
          matching.length === 0 ? empty('No domain matches.') : null);
      }

      function worstStatus(report) {
        const { errors, warnings } = report.summary;
        return errors > 0 ? 'error' : warnings > 0 ? 'warning' : 'ok';
      }

      async function runCheck(name) {
        state.checking.add(name);
        renderDomains();
        try {
          const { body, response } = await api('/domains/' + encodeURIComponent(name) + '/check');
          state.checks.set(name, { report: body, age: Number(response.headers.get('Age') || 0), fetchedAt: Date.now() });
        } catch (error) {
          if (state.token) setMessage('The check of ' + name + ' failed: ' + error.message, 'error');
        } finally {
          state.checking.delete(name);
          renderDomains();
        }
      }

      function renderReport(checked) {
        const { report } = checked;
        const age = Math.round(checked.age + (Date.now() - checked.fetchedAt) / 1000);
        const box = el('div', { class: 'report' },
          el('p', { class: 'note' }, 'braid check, ' + (age > 0 ? age + ' s ago' : 'just now') + ' (kept five minutes): ' +
            report.summary.errors + ' errors, ' + report.summary.warnings + ' warnings, ' + report.summary.ok + ' ok'));
        const groups = [{ title: 'Configuration', checks: report.configuration || [] }].concat(report.domains.map((domain) => ({
          title: domain.domain + (domain.parent ? ' (service of ' + domain.parent + ')' : ''), checks: domain.checks,
        })));
        for (const group of groups) {
          if (!group.checks.length) continue;
          box.append(el('h4', {}, group.title));
          box.append(el('ul', { class: 'checks' }, group.checks.map((check) => el('li', { class: check.status },
            el('span', { class: 'mark' }, MARK[check.status] || '?'), ' ', el('span', { class: 'check-name' }, check.name), ' ', check.message,
            check.hint && check.status !== 'ok' ? el('div', { class: 'hint' }, check.hint) : null))));
        }
        return box;
      }

      function renderSessions(status) {
        const sessions = status.sessions;
        const rows = sessions.by_domain.map((entry) => [entry.domain, number(entry.online)]);
        fill(byId('sessions'),
          el('p', {}, number(sessions.online) + ' online' + (status.scope === 'provider' && rows.length ? '; the busiest domains:' : '')),
          rows.length ? table(['Domain', 'Online'], rows) : empty('No one is online.'));
      }

      function renderLinks() {
        const box = byId('links');
        if (state.links === null) { fill(box, empty('Federation links are shown to provider-wide tokens only.')); return; }
        if (!state.links.length) { fill(box, el('p', { class: 'empty', id: 'no-links' }, 'No federation links.')); return; }
        fill(box, ...state.links.map((link) => {
          const locals = new Set(link.pairs.map((pair) => pair.local));
          const remotes = new Set(link.pairs.map((pair) => pair.remote));
          return el('article', { class: 'link' },
            el('h3', {}, (link.origin === 'outgoing' ? 'Outgoing' : 'Incoming') + ' link to ' + link.peer_address +
              (link.bidirectional ? ' (bidirectional)' : '')),
            el('p', { class: 'note' }, 'id ' + link.id + ': ' + link.pairs.length + ' pair authorisations between ' + locals.size +
              ' local and ' + remotes.size + ' remote domains; ' + number(link.stanzas_sent) + ' stanzas sent, ' +
              number(link.stanzas_received) + ' received'),
            link.pairs.length
              ? table(['Local domain', 'Remote domain', 'Direction', 'Proof'], link.pairs.map((pair) => [
                pair.local, pair.remote, pair.direction === 'outbound' ? 'outbound →' : '← inbound',
                el('span', { class: 'proof' }, pair.method)]), { class: 'pairs' })
              : empty('No pair authorised yet.'));
        }));
      }

      function renderConnections(status) {
        const box = byId('connections');
        const links = status.links;
        if (!links) { fill(box, empty('Shown to provider-wide tokens only.')); return; }
        fill(box,
          facts([
            ['Domain pairs in use', number(links.domain_pairs) + ' (' + number(links.local_domains) + ' local × ' + number(links.remote_domains) + ' remote domains)'],
            ['Classic federation', number(links.classic_connections) + ' connections: one per pair and direction (at most 2·N·M = ' + number(links.classic_upper_bound) + ')'],
            ['Braid', number(links.open) + ' links (' + number(links.outgoing) + ' outgoing, ' + number(links.incoming) + ' incoming)'],
            ['Saved now', number(links.saved_now) + ' connections'],
            ['Saved since start', number(links.connections_saved_total) + ' (pairs that joined a link instead of opening one)'],
          ]),
          barChart('Connections: classic federation and Braid', [
            { label: 'Classic', value: links.classic_connections, class: 'classic' },
            { label: 'Braid', value: links.open, class: 'braid' },
          ]));
      }

      function renderSecurity(status) {
        const security = status.security;
        const parts = [];
        if (security.violations_total !== undefined) {
          parts.push(facts([
            ['Security violations on links', number(security.violations_total)],
            ['Peers refused without a certificate', number(security.certificate_required_refusals_total)],
          ]));
          parts.push(security.stream_errors_sent.length
            ? table(['Stream error sent', 'Stream', 'Count'], security.stream_errors_sent.map((entry) => [entry.condition, entry.stream, number(entry.count)]))
            : empty('No stream errors sent.'));
        }
        parts.push(el('h3', {}, 'Recent refused API requests'));
        parts.push(security.recent.length
          ? table(['Time', 'Action', 'Target', 'Outcome', 'Detail'], security.recent.map((entry) => [time(entry.at), entry.action, entry.target, entry.outcome, entry.detail]))
          : empty('None.'));
        fill(byId('security'), ...parts);
      }

      // MARK: Charts (inline SVG)

      function renderCharts(status) {
        const history = state.history;
        const charts = [lineChart('Online sessions', [{ name: 'sessions', class: 's1', values: history.map((point) => point.sessions) }])];
        if (status.stanzas) {
          const rates = (index) => history.map((point) => (point.rates ? point.rates[index] : null));
          charts.unshift(lineChart('Stanzas per second', [
            { name: 'client in', class: 's1', values: rates(0) }, { name: 'client out', class: 's2', values: rates(1) },
            { name: 's2s in', class: 's3', values: rates(2) }, { name: 's2s out', class: 's4', values: rates(3) },
          ], rate));
        }
        if (status.links) {
          charts.push(lineChart('Federation links and pairs', [
            { name: 'links', class: 's1', values: history.map((point) => point.links) },
            { name: 'pair authorisations', class: 's2', values: history.map((point) => point.pairs) },
          ]));
        }
        fill(byId('charts'), ...charts);
      }

      function lineChart(title, series, format) {
        const show = format || number;
        const width = 380, height = 170, left = 40, right = 8, top = 10, bottom = 44;
        const values = series.flatMap((line) => line.values).filter((value) => typeof value === 'number');
        const max = Math.max(1, ...values);
        // The points spread over the width, however few have been polled yet.
        const x = (index, count) => width - right - (count - 1 - index) * (width - left - right) / Math.max(1, count - 1);
        const y = (value) => top + (height - top - bottom) * (1 - value / max);
        const chart = svg('svg', { viewBox: '0 0 ' + width + ' ' + height, class: 'chart', role: 'img', 'aria-label': title },
          svg('title', {}, title),
          svg('line', { x1: left, y1: y(0), x2: width - right, y2: y(0), class: 'axis' }),
          svg('line', { x1: left, y1: top, x2: left, y2: y(0), class: 'axis' }),
          svg('line', { x1: left, y1: y(max), x2: width - right, y2: y(max), class: 'grid' }),
          svg('text', { x: left - 4, y: y(max) + 4, class: 'tick', 'text-anchor': 'end' }, show(max)),
          svg('text', { x: left - 4, y: y(0) + 4, class: 'tick', 'text-anchor': 'end' }, '0'));
        series.forEach((line, position) => {
          let path = '';
          let last = null;
          line.values.forEach((value, index) => {
            if (typeof value !== 'number') { last = null; return; }
            const point = x(index, line.values.length).toFixed(1) + ' ' + y(value).toFixed(1);
            path += (last === null ? 'M' : ' L') + point;
            last = value;
          });
          if (path) chart.append(svg('path', { d: path, class: 'series ' + line.class }));
          const latest = line.values[line.values.length - 1];
          if (typeof latest === 'number') {
            chart.append(svg('circle', { cx: x(line.values.length - 1, line.values.length), cy: y(latest), r: 2.5, class: 'dot ' + line.class }));
          }
          const legendX = left + (position % 2) * 170, legendY = height - 26 + Math.floor(position / 2) * 14;
          chart.append(svg('rect', { x: legendX, y: legendY - 8, width: 10, height: 10, class: 'swatch ' + line.class }));
          chart.append(svg('text', { x: legendX + 14, y: legendY + 1, class: 'legend' },
            line.name + ': ' + (typeof latest === 'number' ? show(latest) : '–')));
        });
        return el('figure', { class: 'chart-box' }, el('figcaption', {}, title), chart);
      }

      function barChart(title, bars) {
        const width = 380, row = 26, height = bars.length * row + 8, left = 64, right = 60;
        const max = Math.max(1, ...bars.map((bar) => bar.value));
        const chart = svg('svg', { viewBox: '0 0 ' + width + ' ' + height, class: 'chart bars', role: 'img', 'aria-label': title }, svg('title', {}, title));
        bars.forEach((bar, index) => {
          const y = 4 + index * row;
          const length = Math.max(1, (width - left - right) * bar.value / max);
          chart.append(svg('text', { x: left - 6, y: y + 15, class: 'legend', 'text-anchor': 'end' }, bar.label));
          chart.append(svg('rect', { x: left, y: y + 3, width: length.toFixed(1), height: row - 8, class: 'bar ' + bar.class }));
          chart.append(svg('text', { x: left + length + 6, y: y + 15, class: 'legend' }, number(bar.value)));
        });
        return el('figure', { class: 'chart-box' }, el('figcaption', {}, title), chart);
      }

      // MARK: Start

      byId('login-form').addEventListener('submit', (event) => {
        event.preventDefault();
        const token = byId('token').value.trim();
        byId('token').value = '';
        if (token) start(token);
      });
      byId('logout').addEventListener('click', () => logout(''));
      byId('domain-filter').addEventListener('input', renderDomains);

      // #token=… logs in; #check=DOMAIN runs that domain's check once loaded (a link from an
      // alert, say). Both stay out of the address bar and the history.
      const fragment = new URLSearchParams(location.hash.slice(1));
      const given = fragment.get('token');
      const checkFirst = fragment.get('check');
      if (location.hash) history.replaceState(null, '', location.pathname + location.search);
      if (given) sessionStorage.setItem(STORAGE_KEY, given);
      const token = sessionStorage.getItem(STORAGE_KEY);
      if (token) {
        start(token).then(() => {
          if (checkFirst && state.domains.some((domain) => domain.name === checkFirst)) runCheck(checkFirst);
        });
      } else {
        showLogin('');
      }
    })();

    """#

    // MARK: The style sheet

    static let styleSheet = #"""
    :root {
      --ink: #1d2430; --muted: #5b6678; --line: #d9dee7; --paper: #ffffff; --ground: #f3f5f8;
      --ok: #1f7a3d; --warning: #a35c00; --error: #b3261e; --accent: #2356a8;
      --s1: #2356a8; --s2: #d2691e; --s3: #2e8b57; --s4: #8a4fbf;
    }
    * { box-sizing: border-box; }
    body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); background: var(--ground); }
    header { display: flex; align-items: baseline; gap: 1em; padding: 0.8em 1.5em; background: var(--ink); color: #fff; }
    header h1 { margin: 0; font-size: 1.3em; letter-spacing: 0.02em; }
    header #scope, header #updated { color: #c4cad6; font-size: 0.9em; }
    header #logout { margin-left: auto; }
    main, #login { max-width: 1200px; margin: 0 auto; padding: 1em 1.5em 3em; }
    section { background: var(--paper); border: 1px solid var(--line); border-radius: 6px; padding: 0.8em 1.2em 1em; margin: 1em 0; }
    section.cards { display: flex; flex-wrap: wrap; gap: 1em; background: none; border: none; padding: 0; }
    h2 { font-size: 1.1em; margin: 0.2em 0 0.7em; }
    h3 { font-size: 1em; margin: 1em 0 0.4em; }
    h4 { font-size: 0.95em; margin: 0.8em 0 0.3em; }
    #message { max-width: 1200px; margin: 0.8em auto 0; padding: 0 1.5em; min-height: 1.2em; }
    #message.error { color: var(--error); }
    .card { flex: 1 1 180px; background: var(--paper); border: 1px solid var(--line); border-radius: 6px; padding: 0.8em 1em; }
    .card .value { font-size: 1.9em; font-weight: 600; }
    .card .label { color: var(--muted); }
    .note, .empty { color: var(--muted); }
    .empty { font-style: italic; }
    table { border-collapse: collapse; width: 100%; margin: 0.3em 0; }
    th, td { text-align: left; padding: 0.3em 0.6em; border-bottom: 1px solid var(--line); vertical-align: top; }
    thead th { color: var(--muted); font-weight: 600; font-size: 0.9em; }
    table.facts th { width: 16em; font-weight: 500; }
    td.domain { font-weight: 600; }
    .badge { font-weight: 600; }
    .badge.ok, li.ok .mark { color: var(--ok); }
    .badge.warning, li.warning .mark { color: var(--warning); }
    .badge.error, li.error .mark { color: var(--error); }
    tr.check-results td { background: #fafbfc; }
    ul.checks { list-style: none; margin: 0; padding: 0; }
    ul.checks li { padding: 0.15em 0; }
    .check-name { color: var(--muted); font-size: 0.85em; }
    .hint { margin-left: 1.6em; color: var(--muted); white-space: pre-wrap; }
    .proof { font-family: ui-monospace, monospace; background: #eef2f9; border-radius: 3px; padding: 0 0.35em; }
    article.link { border-top: 1px solid var(--line); }
    article.link:first-child { border-top: none; }
    input[type=search], input[type=password] { padding: 0.35em 0.5em; border: 1px solid var(--line); border-radius: 4px; min-width: 20em; }
    button { padding: 0.3em 0.8em; border: 1px solid var(--accent); border-radius: 4px; background: var(--paper); color: var(--accent); cursor: pointer; }
    button:disabled { opacity: 0.6; cursor: default; }
    #login-form { display: flex; gap: 0.6em; align-items: center; flex-wrap: wrap; }
    .charts { display: flex; flex-wrap: wrap; gap: 1em; }
    figure.chart-box { margin: 0; flex: 1 1 360px; max-width: 420px; }
    figcaption { font-weight: 600; margin-bottom: 0.3em; }
    svg.chart { width: 100%; height: auto; background: #fbfcfd; border: 1px solid var(--line); border-radius: 4px; }
    svg .axis { stroke: #8792a2; stroke-width: 1; }
    svg .grid { stroke: var(--line); stroke-dasharray: 3 3; }
    svg .tick, svg .legend { font-size: 10px; fill: var(--muted); }
    svg .series { fill: none; stroke-width: 1.8; }
    svg .series.s1 { stroke: var(--s1); } svg .series.s2 { stroke: var(--s2); }
    svg .series.s3 { stroke: var(--s3); } svg .series.s4 { stroke: var(--s4); }
    svg .dot.s1, svg .swatch.s1 { fill: var(--s1); } svg .dot.s2, svg .swatch.s2 { fill: var(--s2); }
    svg .dot.s3, svg .swatch.s3 { fill: var(--s3); } svg .dot.s4, svg .swatch.s4 { fill: var(--s4); }
    svg .bar.classic { fill: #c2c9d4; } svg .bar.braid { fill: var(--accent); }

    """#
}
