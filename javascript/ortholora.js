// LoRA Toolbox tab (sd-webui-ortholora): small conveniences on top of the gradio tab.
// - "Insert into txt2img prompt" (Inspect view of a joined LoRA) appends the tag to the prompt.
// - After the tab writes files, the webui's extra-networks cards and checkpoint list refresh
//   (the Python side updates the hidden #ortholora_written element; we watch it).
// - Ctrl+Enter inside a sub-tab presses its primary button.
// Works in the webui (A1111 / Forge, via onUiLoaded) and in the standalone server.
(function () {
    "use strict";
    if (window.__ortholoraLoaded) {
        return;
    }
    window.__ortholoraLoaded = true;

    function root() {
        if (typeof gradioApp === "function") {
            return gradioApp();
        }
        var app = document.querySelector("gradio-app");
        if (!app) {
            return document;
        }
        return app.shadowRoot || app;
    }

    function find(selector) {
        return root().querySelector(selector);
    }

    function promptBox(tabname) {
        return find("#" + tabname + "_prompt textarea");
    }

    function notify(button, text) {
        if (!button) {
            return;
        }
        var old = button.getAttribute("data-label") || button.textContent;
        button.setAttribute("data-label", old);
        button.textContent = text;
        setTimeout(function () {
            button.textContent = old;
        }, 1600);
    }

    function insertTag(button) {
        var field = find("#ortholora_prompt_tag textarea") || find("#ortholora_prompt_tag input");
        var tag = field ? field.value.trim() : "";
        if (!tag) {
            notify(button, "No tag to insert");
            return;
        }
        var prompt = promptBox("txt2img");
        if (!prompt) {
            if (navigator.clipboard && window.isSecureContext) {
                navigator.clipboard.writeText(tag);
                notify(button, "Copied (no txt2img prompt here)");
            } else {
                notify(button, "No txt2img prompt on this page");
            }
            return;
        }
        var text = prompt.value;
        prompt.value = text + (text && !/[\s,]$/.test(text) ? ", " : "") + tag;
        if (typeof updateInput === "function") {
            updateInput(prompt);
        } else {
            prompt.dispatchEvent(new Event("input", {bubbles: true}));
        }
        notify(button, "Inserted");
        if (typeof switch_to_txt2img === "function") {
            switch_to_txt2img();
        }
    }

    function clickAll(ids) {
        ids.forEach(function (id) {
            var el = find("#" + id);
            if (el) {
                el.click();
            }
        });
    }

    var lastStamp = null;

    function checkWritten() {
        var data = find("#ortholora_written .ortholora-written-data");
        if (!data) {
            return;
        }
        var stamp = data.getAttribute("data-stamp");
        if (!stamp || stamp === lastStamp) {
            return;
        }
        var first = lastStamp === null;
        lastStamp = stamp;
        if (first && !data.getAttribute("data-written")) {
            return;
        }
        var info = {};
        try {
            info = JSON.parse(data.getAttribute("data-written") || "{}");
        } catch (e) {
            return;
        }
        var kinds = info.kinds || [];
        if (kinds.indexOf("lora") >= 0) {
            clickAll(["txt2img_lora_extra_refresh_internal", "img2img_lora_extra_refresh_internal"]);
        }
        if (kinds.indexOf("checkpoint") >= 0) {
            clickAll(["refresh_sd_model_checkpoint", "txt2img_checkpoints_extra_refresh_internal",
                "img2img_checkpoints_extra_refresh_internal"]);
        }
        root().dispatchEvent(new CustomEvent("ortholora-written", {detail: info}));
    }

    function visibleRunButton(from) {
        var tab = from.closest("[id^='ortholora_tab_']");
        if (!tab) {
            return null;
        }
        var buttons = tab.querySelectorAll("button[id^='ortholora_'][id$='_run']");
        for (var i = 0; i < buttons.length; i++) {
            if (buttons[i].offsetParent !== null) {
                return buttons[i];
            }
        }
        return null;
    }

    function init() {
        var r = root();
        r.addEventListener("click", function (event) {
            var button = event.target.closest && event.target.closest("#ortholora_insert_prompt");
            if (button) {
                event.preventDefault();
                insertTag(button);
            }
        });
        r.addEventListener("keydown", function (event) {
            if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target.closest) {
                var button = visibleRunButton(event.target);
                if (button) {
                    event.preventDefault();
                    button.click();
                }
            }
        });
        if (!promptBox("txt2img")) {
            document.documentElement.classList.add("ortholora-standalone");
        }
        if (typeof onUiUpdate === "function") {
            onUiUpdate(checkWritten);
        } else {
            new MutationObserver(checkWritten).observe(r, {childList: true, subtree: true, attributes: true,
                attributeFilter: ["data-stamp"]});
        }
        checkWritten();
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(init);
    } else if (document.readyState === "loading") {
        document.addEventListener("DOMContentLoaded", init);
    } else {
        init();
    }
})();
